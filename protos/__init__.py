"""The charstream gRPC contract (.proto files) and its generated Python stubs."""
