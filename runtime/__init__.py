"""paraplan's runtime: Plan -> a running job on torch.distributed (issue 4; not built yet)."""
