"""SPoT: Subpixel Placement of Tokens in Vision Transformers."""
from spot.knn import knn_predict
from spot.model import SPoTViT
from spot.oracle import OracleResult, oracle_search
from spot.priors import PRIORS, sample_positions
from spot.tokenizer import extract_windows

__all__ = ["extract_windows", "sample_positions", "PRIORS", "SPoTViT", "oracle_search",
           "OracleResult", "knn_predict"]
