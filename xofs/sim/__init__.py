"""The XO simulator: a stand-in for xo-server that serves REST v0 and JSON-RPC like the real one."""
