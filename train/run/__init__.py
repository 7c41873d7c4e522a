"""The run floor: what both training loops share that is not the maths. runner.py (process setup, the
engine, `Run`) and Run's concerns (run_log, step_guard, input_guard, trace); checkpoints on shared or
node-local disks (checkpoint.py); device binding and host-side messages across machines (cluster.py);
DeepSpeed configs (ds_config.py); the release: fp32 export and its check (export.py), the model card
(release.py), the merge with the base (merge.py); the data check (validation.py) and what rank 0 reads
once for every rank (rank_zero_data.py)."""
