"""The developer scripts (schema, demo, weight packing), importable so that the tests can run their parts."""
