"""The real HA daemon `corral-ha`: the HA logic run against the mounted configuration
filesystem (fsenv), a watchdog (watchdog), guests through a resource agent (agent) and the
main loop (main)."""
