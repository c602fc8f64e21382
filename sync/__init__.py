"""Side effects of weight sync: the executor, transports, sources, engines and the CLI."""
