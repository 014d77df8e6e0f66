"""Built-in tasks: seeded generators that write problems in the format of the run directory."""
