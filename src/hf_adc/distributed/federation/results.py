"""What a federation reports: every client's bytes and accuracy (as the client reported them at END, and the bytes as
the server itself counted them on its connections), the totals, and the record kept in the halves."""

from pathlib import Path

from .halves import half_size

TOTAL_FIELDS = ("uplink_bytes", "downlink_bytes", "sync_bytes", "total_bytes", "uncompressed_bytes")  # reported
COUNTED_FIELDS = ("counted_uplink_bytes", "counted_downlink_bytes")  # the server's own count: frames, both ways


def federation_results(federation) -> dict:
    """`server_results.json` of a `FederatedServer`: status, plan, drops and rejoins, per client and in total."""
    members = dict(sorted(federation.members.members.items()))
    clients = {
        str(cid): {
            "live": m.live, "finished": m.finished, "shard_size": m.shard_size, **m.results,
            **dict(zip(COUNTED_FIELDS, m.counted(), strict=True)),
        }
        for cid, m in members.items()
    }  # fmt: skip
    totals = {key: sum(client.get(key, 0) for client in clients.values()) for key in TOTAL_FIELDS + COUNTED_FIELDS}
    dropped = [cid for cid, m in members.items() if not m.live]
    failure = federation.members.failure
    detail = failure or ("finished" if not dropped else "finished without " + ", ".join(map(str, dropped)))
    return {
        "status": "finished" if not failure else "failed",
        "detail": detail,
        "schedule": federation.schedule.name,
        "num_clients": federation.num_clients,
        "sync_every": federation.sync_every,
        "plan": vars(federation.plan) if federation.plan else None,
        "steps": federation.steps,
        "dropped": dropped,
        "drops": federation.members.drops,
        "rejoined": federation.members.rejoined,
        "clients": clients,
        "total": totals,
        "half_bytes": half_size(federation.client_tensors) * 4,
        "sync_transfers": federation.sync_transfers,
        "resumed_from": federation.resumed_step,
    }


def save_federation(split, results: dict, output_dir: Path) -> None:
    """The split as the server holds it (`client/` is the final averaged or handed-off client half, `server/` the
    server's, and `head/` a U-shaped split's head when the heads are shared), each part's config recording the
    federation: schedule, clients, and the bytes every client and the sync sent."""
    record = {key: results[key] for key in ("schedule", "num_clients", "sync_every", "dropped", "total")}
    total = results["total"]
    communication = {
        "uplink_bytes": total["uplink_bytes"],
        "downlink_bytes": total["downlink_bytes"],
        "sync_bytes": total["sync_bytes"],
        "uncompressed_bytes": total["uncompressed_bytes"],
        "ratio": total["total_bytes"] / total["uncompressed_bytes"] if total["uncompressed_bytes"] else 1.0,
        "steps": results["steps"],
        "test_accuracy": next((c["test_accuracy"] for c in results["clients"].values() if c.get("finished")), None),
    }
    for half in (part for part in split.parts().values() if part is not None):
        half.config.federation = record
        half.config.communication = communication
    split.save_pretrained(output_dir)
