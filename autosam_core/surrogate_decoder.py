"""The surrogate decoder h: dense_prompt_embeddings g(I) -> mask logits (AutoSAM paper section 3,
"A surrogate decoder for g(I)"): two deconvolution layers taking the 256x64x64 embedding to a
256x256 map, trained with g fixed, as a lightweight alternative to SAM's mask decoder."""

from __future__ import annotations

from torch import Tensor, nn


class SurrogateDecoder(nn.Module):
    """h = ConvTranspose2d(embed_dim -> hidden, k=2, s=2) -> BatchNorm -> ReLU ->
    ConvTranspose2d(hidden -> 1, k=2, s=2) (paper section 3; exactly two deconvolutions).

    Args:
        embed_dim: channels of the input embedding (256).
        hidden: channels between the two deconvolutions (64).
        embedding_size: expected (h, w) of the input (64, 64); the output is 4x that.

    ``forward(dense_prompt_embeddings (B, embed_dim, 64, 64) float32, typically in [-1, 1])``
    -> mask logits (B, 1, 256, 256) float32, unbounded. Raises ValueError naming the shape for any
    other input shape.
    """

    def __init__(self, embed_dim: int = 256, hidden: int = 64,
                 embedding_size: tuple[int, int] = (64, 64)) -> None:
        super().__init__()
        self.embed_dim, self.embedding_size = embed_dim, tuple(embedding_size)
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, hidden, kernel_size=2, stride=2),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(hidden, 1, kernel_size=2, stride=2),
        )

    def forward(self, dense_prompt_embeddings: Tensor) -> Tensor:
        x = dense_prompt_embeddings
        if x.ndim != 4 or x.shape[1] != self.embed_dim or tuple(x.shape[-2:]) != self.embedding_size:
            raise ValueError(f"SurrogateDecoder expects (B, {self.embed_dim}, {self.embedding_size[0]}, "
                             f"{self.embedding_size[1]}), got {tuple(x.shape)}")
        return self.layers(x)
