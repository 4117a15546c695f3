"""What every repair does to a model: pick its layers, read their inputs through hooks, snapshot and
restore their weights (also when FSDP or ZeRO-3 shards them)."""
