"""What templates run in: processing environments (one per instrument or technique), their
kernelspecs, the warm kernel pool and the fork servers it starts kernels from."""
