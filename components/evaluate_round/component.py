"""Evaluation: held-out perplexity of the committed global adapter (at r_max and at each
client's rank) on every client's held-out text; pushes the round's metrics when a Pushgateway
is configured. At round 0 it also records the base model's perplexity."""


def evaluate_round(config_json: str, round_index: int, round_started_at: float = 0.0) -> str:
    """Returns a JSON summary: global and personalised perplexity."""
    from hetlora_core.steps.evaluate import evaluate_task

    return evaluate_task(config_json, round_index, round_started_at)
