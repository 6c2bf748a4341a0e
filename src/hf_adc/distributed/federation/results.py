"""What a federation reports, and what it records in the halves: the server's own measurements as the model's
figures, and whatever a member reported (its ledger, its accuracy) under keys that say so.

A member's END carries its own ledger and accuracies. Nothing stops a hostile member from forging them (a test
accuracy of 1.0, a ratio of 0), so they never become the model's record: `server_results.json` keeps them under each
client's `reported` and in `reported_total`, and the saved configs under `client_reported`. What the server counted
itself (every frame both ways on its connections, the halves it sent and received, its optimizer steps) is `total`
and the configs' `communication`.
"""

from pathlib import Path

from .halves import half_size

REPORTED_FIELDS = ("uplink_bytes", "downlink_bytes", "sync_bytes", "total_bytes", "uncompressed_bytes")
COUNTED_FIELDS = ("counted_uplink_bytes", "counted_downlink_bytes")  # the server's own count: frames, both ways


def federation_results(federation) -> dict:
    """`server_results.json` of a `FederatedServer`: status, plan, drops and rejoins, per client and in total.

    The status is `failed` when the federation could not go on, `degraded` when it finished without some members
    (dropped, or charged with a half that broke the average), and `finished` only when every member finished."""
    members = dict(sorted(federation.members.members.items()))
    clients = {
        str(cid): {
            "live": m.live, "finished": m.finished, "shard_size": m.shard_size, "steps": m.steps,
            **dict(zip(COUNTED_FIELDS, m.counted(), strict=True)),
            "clipped_rounds": sum(scale < 1.0 for scale in m.update_scales), "drop_reason": m.drop_reason,
            "reported": dict(m.results),
        }
        for cid, m in members.items()
    }  # fmt: skip
    half_bytes = half_size(federation.client_tensors) * 4
    counted = {key: sum(client[key] for client in clients.values()) for key in COUNTED_FIELDS}
    totals = {
        **counted, "sync_bytes": federation.sync_transfers * half_bytes,
        "total_bytes": counted["counted_uplink_bytes"] + counted["counted_downlink_bytes"],
    }  # fmt: skip
    reported = {key: sum(c["reported"].get(key, 0) for c in clients.values()) for key in REPORTED_FIELDS}
    dropped = [cid for cid, m in members.items() if not m.live]
    failure = federation.members.failure
    detail = failure or ("finished" if not dropped else "finished without " + ", ".join(map(str, dropped)))
    return {
        "status": "failed" if failure else ("degraded" if dropped else "finished"),
        "detail": detail,
        "schedule": federation.schedule.name,
        "num_clients": federation.num_clients,
        "sync_every": federation.sync_every,
        "aggregation": federation.aggregation,
        "clip_updates": federation.clip_updates,
        "plan": vars(federation.plan) if federation.plan else None,
        "steps": federation.steps,
        "dropped": dropped,
        "drops": federation.members.drops,
        "rejoined": federation.members.rejoined,
        "clients": clients,
        "total": totals,
        "reported_total": reported,
        "half_bytes": half_bytes,
        "sync_transfers": federation.sync_transfers,
        "resumed_from": federation.resumed_step,
    }


def save_federation(split, results: dict, output_dir: Path) -> None:
    """The split as the server holds it (`client/` is the final averaged or handed-off client half, `server/` the
    server's, and `head/` a U-shaped split's head when the heads are shared), each part's config recording the
    federation and the bytes as the server counted them (`communication`), and the members' own figures apart
    (`client_reported`: their ledgers summed, and the test accuracy of the first that finished)."""
    record = {key: results[key] for key in ("schedule", "num_clients", "sync_every", "dropped", "total", "status")}
    total, reported = results["total"], results["reported_total"]
    communication = {
        "uplink_bytes": total["counted_uplink_bytes"],
        "downlink_bytes": total["counted_downlink_bytes"],
        "steps": results["steps"],
        "counted_by": "server",
    }
    finished = [c["reported"] for c in results["clients"].values() if c["finished"]]
    client_reported = {
        **reported,
        "ratio": reported["total_bytes"] / reported["uncompressed_bytes"] if reported["uncompressed_bytes"] else None,
        "test_accuracy": finished[0].get("test_accuracy") if finished else None,
    }
    for half in (part for part in split.parts().values() if part is not None):
        half.config.federation = record
        half.config.communication = communication
        half.config.client_reported = client_reported
    split.save_pretrained(output_dir)
