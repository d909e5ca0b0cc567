"""Aggregation: verify the round's client uploads, check the quorum, aggregate with the
configured strategy and commit the new global adapter (its manifest is written last).

One list input per rank tier (``tier_0`` .. ``tier_7``) receives that tier's ``dsl.Collected``
prune reports; the reports are cross-checked, the store's checksummed manifests are what count."""

from typing import List


def aggregate_round(config_json: str, round_index: int, tier_0: List[str] = [], tier_1: List[str] = [],
                    tier_2: List[str] = [], tier_3: List[str] = [], tier_4: List[str] = [], tier_5: List[str] = [],
                    tier_6: List[str] = [], tier_7: List[str] = []) -> str:
    """Returns a JSON summary: participants, dropped uploads with reasons, unreported clients."""
    from hetlora_core.steps.aggregate import aggregate_task

    reports = [*tier_0, *tier_1, *tier_2, *tier_3, *tier_4, *tier_5, *tier_6, *tier_7]
    return aggregate_task(config_json, round_index, reports)


MAX_TIERS = 8
