"""Step 3, the runner: one message becomes one executed notebook (reduce.py), the consumer-group
member that feeds it (consumer.py), and papermill execution on provided kernels."""
