vllm serve llama2-70b --tensor-parallel-size 4 --pipeline-parallel-size 1 --max-num-seqs 787 --max-model-len 640 --block-size 16 --gpu-memory-utilization 0.9 --dtype bfloat16 --data-parallel-size 2
