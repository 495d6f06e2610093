"""corrald: the node daemon (engine, CPG, quorum, config sync, control socket, join API)."""
