"""A fleet of emulated devices from real data: chatterbot-corpus users (one user per group of categories), each with
its own device profile. Each device folder gets the user's stream.jsonl and heldout.jsonl (the user's last dialogues,
their future; corpora.chatterbot_user_stream's time split)."""

from __future__ import annotations

from pathlib import Path

from ..data.corpora import chatterbot_user_stream, write_user_stream
from .launch import DeviceSpec

# one user per group of chatterbot-corpus categories: what each of them talks about
USERS = {
    "techie": ["computers", "coding", "ai", "tech_support"],
    "scholar": ["history", "literature", "science", "trivia"],
    "chatter": ["greetings", "conversations", "emotion", "psychology", "humor", "gossip"],
    "citizen": ["food", "health", "money", "sports", "politics", "movies"],
}
# phones of different sizes, in the order of USERS (mesp-mlx profiles)
PROFILES = ["iphone-17-pro", "phone-6gb-background", "phone-8gb-background", "iphone-15-pro-max"]


def parse_device(text: str) -> DeviceSpec:
    """DIR, DIR:PROFILE or DIR:MB (a budget in MB)."""
    folder, _, budget = text.partition(":")
    if not budget:
        return DeviceSpec(Path(folder))
    try:
        return DeviceSpec(Path(folder), budget_mb=float(budget))
    except ValueError:
        return DeviceSpec(Path(folder), profile=budget)


def chatterbot_fleet(n: int, out: str | Path, held_out: int = 20, seed: int = 0,
                     profiles: list[str] | None = None) -> list[DeviceSpec]:
    """n (<= 4) devices: out/<user>/stream.jsonl + heldout.jsonl, one user per group of categories."""
    if not 1 <= n <= len(USERS):
        raise ValueError(f"a chatterbot fleet has 1 to {len(USERS)} users, not {n}")
    profiles = profiles or PROFILES
    devices = []
    for i, (user, categories) in enumerate(list(USERS.items())[:n]):
        stream, held = chatterbot_user_stream(seed, held_out, categories)
        write_user_stream(stream, held, Path(out) / user)
        devices.append(DeviceSpec(Path(out) / user, profile=profiles[i % len(profiles)]))
    return devices
