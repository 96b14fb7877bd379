"""paraplan's runtime: a Plan -> a running job on torch.distributed.

One module per technique, like torchtitan's `distributed/`: `mesh` (DeviceMesh from the
plan's named axes), `tensor_parallel` (DTensor TP/SP from the placements), `data_parallel`
(FSDP2 / HSDP by ZeRO level), `pipeline` (stages cut at the plan's layer ranges, its
schedule), `activation_checkpoint`, `data`, `checkpoint` (DCP), `train` (the loop) and
`launch` (torchrun). It reads a Plan and the model zoo, and nothing else of the planner.
"""
