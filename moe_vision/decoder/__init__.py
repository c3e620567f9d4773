"""GLID encoder-decoder pieces shared by every task: pixel decoder and query decoder."""
from .pixel_decoder import PixelDecoder, sine_position_embedding
from .query_decoder import QueryDecoder

__all__ = ["PixelDecoder", "QueryDecoder", "sine_position_embedding"]
