"""Sample-quality metrics: FD-EffNetLite0, KID, k-NN precision/recall and a fine/coarse classifier.

Every module here imports only numpy and torch at import time; torch-fidelity (whose metric functions
we reuse), tqdm and safetensors are imported inside the functions that need them.
"""
from efdit.metrics.classifier import (HierarchicalClassifier, accuracy_report, classify, hierarchy_scores,
                                      load_classifier, load_or_train_classifier, save_classifier, train_classifier)
from efdit.metrics.fd import feature_stats, frechet_distance, frechet_distance_from_features
from efdit.metrics.features import EfficientNetLite0, FeatureExtractor, load_effnet_lite0, weights_sha256
from efdit.metrics.kid import KID, kernel_distance
from efdit.metrics.prdc import PrecisionRecall, precision_recall

__all__ = ["EfficientNetLite0", "FeatureExtractor", "load_effnet_lite0", "weights_sha256",
           "feature_stats", "frechet_distance", "frechet_distance_from_features",
           "KID", "kernel_distance", "PrecisionRecall", "precision_recall",
           "HierarchicalClassifier", "train_classifier", "save_classifier", "load_classifier",
           "load_or_train_classifier", "classify", "hierarchy_scores", "accuracy_report"]
