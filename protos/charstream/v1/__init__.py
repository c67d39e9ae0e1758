"""charstream.v1: generator.proto and the stubs generated from it (do not edit them)."""
