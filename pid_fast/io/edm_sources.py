"""The EDM network sources the importer knows, by sha256 of the source text a snapshot embeds.

An EDM snapshot carries, for each network object, the full text of the Python module that
defined its class (`module_src`; EDM's `torch_utils.persistence` stores
`inspect.getsource(module)`). pid_fast never runs that text: it maps the weights onto its own
re-implementation of EDM's networks. That is right only when the snapshot was made by the
released EDM code, so the importer compares the hash of every embedded source in the chosen
network with KNOWN_EDM_SOURCES and stops on any other source unless the caller accepts it
explicitly (`allow_unknown_source=True`, `pid-fast convert --allow-unknown-source`).

What is verified: the two entries below are the sha256 of `training/networks.py` at the two
commits of NVlabs/edm's main branch that touch that file (every version of it in the released
repository's history; the file is LF-only, UTF-8, ends in a newline, so the file's bytes are
exactly what `inspect.getsource` returns). Both define the same SongUNet/DhariwalUNet/EDMPrecond
computation for the configurations pid_fast supports (the later commit changes only the padding
of Conv2d's fused up-sampling path with a kernel wider than 1, which none of EDM's published
architectures uses; pid_fast implements the later version).
What is NOT verified: that the published network-snapshot-*.pkl files (edm-cifar10-32x32-*.pkl,
edm-imagenet-64x64-cond-adm.pkl, ...) embed one of these two texts byte for byte. They were
written by NVIDIA's own training runs, which may have used a pre-release copy of the file; if a
published snapshot embeds another text, add its hash here after checking that text against the
released file.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from pid_fast.io.edm_pickle import ModuleStub, PersistentObject
from pid_fast.io.errors import UnknownSourceError

__all__ = ["KNOWN_EDM_SOURCES", "KNOWN_EDM2_SOURCES", "unknown_sources", "check_sources"]

# sha256 of the module source text -> where it comes from.
KNOWN_EDM_SOURCES: dict[str, str] = {
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef":
        "NVlabs/edm training/networks.py @ 0a2ff34 (2022-10-31, initial release)",
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284":
        "NVlabs/edm training/networks.py @ b2a26c9 (2022-11-21, 'Fix to #2'; current main)",
}


# The same for EDM2 (NVlabs/edm2): sha256 of `training/networks_edm2.py`, which defines every
# class of an EDM2 network (Precond, UNet, Block, MPConv, MPFourier). Verified: the file has one
# version in the released repository's history (commits d8299d3 .. 4bf8162 leave it unchanged;
# LF-only, UTF-8, ends in a newline). Not verified: that the published edm2-img*.pkl files embed
# exactly this text (same caveat as above). A separate table: an EDM2 class name must come with
# EDM2's source, never with EDM's.
KNOWN_EDM2_SOURCES: dict[str, str] = {
    "7298880db4bf955d2941496cce3a554a970867b3eae4d22276cb1c293c131fa2":
        "NVlabs/edm2 training/networks_edm2.py @ d8299d3 (2024-03-18, initial release; unchanged on main)",
}


def _persistent_objects(node: Any, path: str) -> Iterator[tuple[str, PersistentObject]]:
    # Every persistent object in a module tree, with its dotted path ('ema', 'ema.model.enc', ...).
    if isinstance(node, PersistentObject):
        yield path, node
    if isinstance(node, (PersistentObject, ModuleStub)):
        children = node.state.get("_modules")
        if isinstance(children, Mapping):
            for name, child in children.items():
                yield from _persistent_objects(child, f"{path}.{name}")


def unknown_sources(network: Any, path: str = "ema",
                    known: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """One record {'object', 'class_name', 'module_src_sha256'} per distinct source in the network
    tree that is not in `known` (default KNOWN_EDM_SOURCES; the first object embedding it names it)."""
    known = KNOWN_EDM_SOURCES if known is None else known
    found: dict[str, dict[str, str]] = {}
    for where, obj in _persistent_objects(network, path):
        if obj.module_src_sha256 not in known and obj.module_src_sha256 not in found:
            found[obj.module_src_sha256] = {"object": where, "class_name": obj.class_name,
                                            "module_src_sha256": obj.module_src_sha256}
    return list(found.values())


def check_sources(network: Any, path: str = "ema", allow_unknown_source: bool = False, *,
                  known: Mapping[str, str] | None = None, family: str = "EDM") -> list[dict[str, str]]:
    """The unknown sources of `network` (see unknown_sources; `known` defaults to
    KNOWN_EDM_SOURCES, KNOWN_EDM2_SOURCES for family 'EDM2'); raises UnknownSourceError if there
    are any and `allow_unknown_source` is false."""
    if known is None:
        known = KNOWN_EDM2_SOURCES if family == "EDM2" else KNOWN_EDM_SOURCES
    unknown = unknown_sources(network, path, known)
    if unknown and not allow_unknown_source:
        first = unknown[0]
        more = f" (and {len(unknown) - 1} other unknown source(s))" if len(unknown) > 1 else ""
        raise UnknownSourceError(
            f"{first['object']} ({first['class_name']}) was pickled with a network module whose source is not a "
            f"released {family} version (embedded module_src sha256 {first['module_src_sha256']}){more}. "
            f"pid_fast would map its weights onto {family}'s stock {first['class_name']}, which computes what the released code "
            f"computes, not necessarily what this file's code does (a fork may change the forward pass). If you "
            f"know the source matches {family}'s, accept it explicitly with allow_unknown_source=True "
            f"(pid-fast convert --allow-unknown-source); the converted file then records the accepted hash.")
    return unknown
