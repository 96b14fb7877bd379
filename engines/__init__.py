"""Plans in the engines users already run, and their configs read back to be priced:
torchtitan (job TOML), Megatron-LM (arguments), DeepSpeed (JSON), vLLM (`vllm serve`).
Each module is one engine; none is imported by planner, costmodel or runtime."""
