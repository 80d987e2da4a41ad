"""Device kernels: `triton/` (CUDA; also runs on a CPU under TRITON_INTERPRET=1 for tests)
and `cpu/` (the measured-fastest CPU paths). Every kernel has a torch reference with the
same signature; the references are the oracle in tests."""
