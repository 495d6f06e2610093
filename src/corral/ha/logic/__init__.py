"""Sans-I/O HA logic: no clocks, sockets, threads or randomness; everything through the env."""
