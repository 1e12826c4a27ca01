"""Security tests: what hostile guest code must not reach or grow on the host, and least privilege inside the VM (issue 16). Mirrors the split of Firecracker's integration tests."""
