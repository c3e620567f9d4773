"""GLID encoder-decoder pieces shared by every task: pixel decoder and query decoder."""
from .pixel_decoder import DecoderInputs, PixelDecoder, sine_embed_points
from .query_decoder import DEFAULT_NUM_QUERIES, QueryDecoder, Queries

__all__ = ["DEFAULT_NUM_QUERIES", "DecoderInputs", "PixelDecoder", "QueryDecoder", "Queries", "sine_embed_points"]
