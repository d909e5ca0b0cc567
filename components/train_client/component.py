"""Client training: one selected client's local LoRA update with the tail regulariser.

Runs on its rank tier's node pool (resources set by the pipeline). Reads the global adapter from
the store, truncates it to the client's rank, trains, uploads ``clients/<id>/trained``."""


def train_client(config_json: str, round_index: int, client_id: str) -> str:
    """Returns a JSON summary: client id, train loss, rank trained."""
    from hetlora_core.steps.train import train_task

    return train_task(config_json, round_index, client_id)
