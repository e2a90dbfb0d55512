"""DARTS in plain PyTorch: search space, supernet, architect, genotypes, evaluation networks, data, pictures.

No Ray and no MLflow here: a search runs in a notebook with this package alone::

    from nas import load_config, search
    result = search(load_config("digits", ["search.epochs=2"]))
    print(result.genotype)
"""

from nas.architect import Architect
from nas.config import Config, ConfigError, DataConfig, RetrainConfig, SearchConfig, SpeedConfig, load_config
from nas.eval_model import EvalNetwork, NetworkSpec, count_parameters
from nas.genotypes import GENOTYPES, Genotype, GenotypeError, derive_genotype, parse_genotype
from nas.loop import EpochRecord, GenotypeField, LoopContext
from nas.ops import PRIMITIVES, build_op, register_op, registered_ops
from nas.retrain import RetrainEpoch, RetrainResult, RetrainRun, retrain
from nas.search import SearchEpoch, Searcher, SearchResult, SearchRun, search
from nas.search_model import SearchNetwork

__all__ = [
    "GENOTYPES",
    "PRIMITIVES",
    "Architect",
    "Config",
    "ConfigError",
    "DataConfig",
    "EpochRecord",
    "EvalNetwork",
    "Genotype",
    "GenotypeError",
    "GenotypeField",
    "LoopContext",
    "NetworkSpec",
    "RetrainConfig",
    "RetrainEpoch",
    "RetrainResult",
    "RetrainRun",
    "SearchConfig",
    "SearchEpoch",
    "SearchNetwork",
    "SearchResult",
    "SearchRun",
    "Searcher",
    "SpeedConfig",
    "build_op",
    "count_parameters",
    "derive_genotype",
    "load_config",
    "parse_genotype",
    "register_op",
    "registered_ops",
    "retrain",
    "search",
]
