vllm serve meta-llama/Llama-2-70b-hf --tensor-parallel-size 1 --pipeline-parallel-size 8 --max-num-seqs 2217 --max-model-len 640 --block-size 16 --gpu-memory-utilization 0.9 --dtype bfloat16
