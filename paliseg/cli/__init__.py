"""The `paliseg` command: the one module that sees every stage."""
