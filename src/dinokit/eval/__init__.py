"""Evaluation of frozen backbones: k-NN, linear probing and logistic regression (official protocols).

Each protocol has a pure core that works on feature tensors (``knn_classify``/``evaluate_knn``,
``LinearProbes``/``train_probes``, ``evaluate_logreg``) and a ``*_protocol(ctx)`` function used by
``dinokit eval``, where ``ctx`` (:func:`prepare_eval`) holds the backbone, the datasets and the
feature cache. :class:`KnnMonitor` is the hook that training commands pass to the engine.
"""

from .knn import KnnResult, evaluate_knn, knn_classify, knn_protocol, run_knn_eval, sample_per_class
from .linear import LEARNING_RATES, LinearProbes, LinearResult, linear_protocol, probe_input, train_probes
from .monitor import KnnMonitor, knn_monitor
from .logreg import LogregResult, c_grid, evaluate_logreg, fit_logreg, logreg_protocol
from .feature_cache import FeatureCache
from .setup import EvalContext, RawPixels, build_eval_backbone, prepare_eval, setup_eval_model

__all__ = [
    "EvalContext",
    "FeatureCache",
    "KnnMonitor",
    "KnnResult",
    "LEARNING_RATES",
    "LinearProbes",
    "LinearResult",
    "LogregResult",
    "RawPixels",
    "build_eval_backbone",
    "c_grid",
    "evaluate_knn",
    "evaluate_logreg",
    "fit_logreg",
    "knn_classify",
    "knn_monitor",
    "knn_protocol",
    "linear_protocol",
    "logreg_protocol",
    "prepare_eval",
    "probe_input",
    "run_knn_eval",
    "sample_per_class",
    "setup_eval_model",
    "train_probes",
]
