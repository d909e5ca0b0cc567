"""Federated evaluation (folder data): one client evaluates the committed global on its own eval
split (at r_max, at its own rank, and the base model while the run has no baseline) and uploads
only sums; the evaluate task combines them. One task per client, on its tier's node pool."""


def evaluate_client(config_json: str, round_index: int, client_id: str) -> str:
    """Returns a short JSON status; the sums go to the store (the server reads them there)."""
    from hetlora_core.steps.evaluate_client import evaluate_client_task

    return evaluate_client_task(config_json, round_index, client_id)
