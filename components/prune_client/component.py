"""Self-pruning: the prune decision and truncation of one client's trained adapter.

Needs only the adapter as received and as trained (no model, no transformers import), so it is a
cheap task. Writes the client's final upload and its manifest (the client's commit)."""


def prune_client(config_json: str, round_index: int, client_id: str) -> str:
    """Returns a JSON summary: client id, rank before and after, sha256 of the upload."""
    from hetlora_core.warm import run_step  # hetlora_core.steps.prune:prune_task, in the local warm server if any

    return run_step("prune", config_json, round_index, client_id)
