"""Fuzz tests: bytes from the network, gRPC requests and config files, thousands of cases."""
