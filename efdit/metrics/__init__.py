"""Sample-quality metrics: FD-EffNetLite0, KID, k-NN precision/recall and a fine/coarse classifier; bootstrap
intervals and paired comparisons; per-level scores; a linear-probe judge; Inception FID / IS and FD-DINOv2 from
local weights; the comparability card.

Every module here imports only numpy and torch at import time; torch-fidelity (whose metric functions
we reuse), transformers, scipy.stats, tqdm and safetensors are imported inside the functions that need them.
"""
from efdit.metrics.bootstrap import (
                                     BootstrapResult,
                                     Difference,
                                     FrechetReference,
                                     Interval,
                                     bootstrap_metrics,
                                     combine_seeds,
                                     difference_result,
                                     draw_indices,
                                     frechet_distance_exact,
                                     paired_difference,
                                     percentile_interval,
                                     unpaired_difference,
)
from efdit.metrics.card import CARD_FIELDS, card_differences, comparability_card, describe_differences
from efdit.metrics.classifier import (
                                     HierarchicalClassifier,
                                     accuracy_report,
                                     classify,
                                     hierarchy_scores,
                                     load_classifier,
                                     load_or_train_classifier,
                                     save_classifier,
                                     train_classifier,
)
from efdit.metrics.fd import feature_stats, frechet_distance, frechet_distance_from_features
from efdit.metrics.features import EfficientNetLite0, FeatureExtractor, load_effnet_lite0, weights_sha256
from efdit.metrics.kid import KID, kernel_distance
from efdit.metrics.per_class import fine_acc_given_super, intra_class_fd, per_superclass_fd
from efdit.metrics.prdc import PrecisionRecall, precision_recall
from efdit.metrics.probe import FeatureProbe, judge_reliability, load_probe, probe_report, save_probe, train_probe

__all__ = ["EfficientNetLite0", "FeatureExtractor", "load_effnet_lite0", "weights_sha256",
           "feature_stats", "frechet_distance", "frechet_distance_from_features",
           "KID", "kernel_distance", "PrecisionRecall", "precision_recall",
           "HierarchicalClassifier", "train_classifier", "save_classifier", "load_classifier",
           "load_or_train_classifier", "classify", "hierarchy_scores", "accuracy_report",
           "Interval", "Difference", "BootstrapResult", "FrechetReference", "bootstrap_metrics", "draw_indices",
           "percentile_interval", "paired_difference", "unpaired_difference", "difference_result", "combine_seeds",
           "frechet_distance_exact", "per_superclass_fd", "intra_class_fd", "fine_acc_given_super",
           "FeatureProbe", "train_probe", "probe_report", "judge_reliability", "save_probe", "load_probe",
           "CARD_FIELDS", "comparability_card", "card_differences", "describe_differences"]
