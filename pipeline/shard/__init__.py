"""One shard of a job, on one device: `open_context` loads the model once (context.py), and
`process_shard` captions a shard's rows (process.py): read and decode (rows.py), the prompts a row
asks (requests.py), the engine's stream, and each chunk committed whole (writer.py)."""

from pipeline.shard.context import (
    JobContext,
    cache_record,
    job_prompt_length,
    open_context,
    plan_before_loading,
    tensor_parallel_groups,
)
from pipeline.shard.process import process_shard

__all__ = ["JobContext", "cache_record", "job_prompt_length", "open_context", "plan_before_loading",
           "process_shard", "tensor_parallel_groups"]
