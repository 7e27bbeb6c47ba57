"""kvlane.policy.topology: the fabric model (nodes → GPUs → NIC ports → switches), candidate paths per GPU
pair, locality, generators for every fabric in the seed, YAML topology files and affinity-tile placement.

Pure policy code (runs in the policy service and the CLI): no sockets, no clock, no vLLM/torch.
"""

from .generators import GENERATORS, generate, generators_help, parse_spec
from .loader import load_topology, load_yaml, topology_from_dict
from .model import Distance, Link, Locality, Path, Topology, TopologyError
from .placement import Placement, plan_tiles

__all__ = [
    "GENERATORS", "Distance", "Link", "Locality", "Path", "Placement", "Topology", "TopologyError",
    "generate", "generators_help", "load_topology", "load_yaml", "parse_spec", "plan_tiles",
    "topology_from_dict",
]
