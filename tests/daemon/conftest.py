"""The daemon tests share the cluster tests' DemoCluster fixture."""

from tests.cluster.conftest import make_cluster  # noqa: F401 (a pytest fixture)
