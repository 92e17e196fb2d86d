"""RAG traffic: shared instructions, k retrieved documents of a Zipf-popular pool, a question.

A pool of `num_documents` documents (lognormal lengths around `document_len_mean`); document
i (0-based) is retrieved with weight 1 / (i + 1) ** zipf_s, k distinct documents per query.
The retriever's order varies from query to query: the documents come sorted by a noisy
relevance score (popularity rank plus noise, `order_noise`), so two queries that retrieve the
same documents share a prefix only as far as their orders agree. The prompt is the shared
instructions, then the documents, then the question. Queries arrive as a Poisson process at
`request_rate`; each is its own session. With `followups_mean` > 0 a session asks follow-up
questions about the same documents (a Poisson number with that mean), each `think_time_mean_s`
(exponential) after the previous answer, quoting the conversation so far ("chat with your
documents"); the default, 0, is single-turn retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workloads.trace import (
    LLAMA3_VOCAB,
    KeyMaker,
    Segment,
    Trace,
    TraceRequest,
    header_for,
    lognormal_lengths,
    poisson_arrivals,
)


@dataclass(frozen=True)
class RagConfig:
    seed: int = 0
    num_requests: int = 2000
    request_rate: float = 20.0
    num_documents: int = 2000
    document_len_mean: float = 800.0
    zipf_s: float = 1.1
    top_k: int = 4
    order_noise: float = 1.0
    instructions_len: int = 512
    question_len_mean: float = 48.0
    output_len_mean: float = 200.0
    length_sigma: float = 0.6
    followups_mean: float = 0.0
    think_time_mean_s: float = 5.0
    vocab_size: int = LLAMA3_VOCAB


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def generate_rag(config: RagConfig) -> Trace:
    if not 1 <= config.top_k <= config.num_documents:
        raise ValueError("need 1 <= top_k <= num_documents")
    rng = np.random.default_rng(config.seed)
    keys = KeyMaker(config.seed, stream=5)
    instructions = Segment(keys(), config.instructions_len)
    lengths = lognormal_lengths(
        rng, config.document_len_mean, config.length_sigma, config.num_documents, 32, 8192
    )
    documents = [Segment(keys(), n) for n in lengths]
    popularity = zipf_weights(config.num_documents, config.zipf_s)
    arrivals = poisson_arrivals(rng, config.request_rate, config.num_requests)
    questions = lognormal_lengths(
        rng, config.question_len_mean, config.length_sigma, config.num_requests, 4, 512
    )
    outputs = lognormal_lengths(
        rng, config.output_len_mean, config.length_sigma, config.num_requests, 4, 2048
    )
    requests: list[TraceRequest] = []
    for i in range(config.num_requests):
        picked = rng.choice(config.num_documents, size=config.top_k, replace=False, p=popularity)
        # Relevance: popular documents tend to rank first, with noise in log-rank units.
        score = -np.log1p(picked) + rng.normal(0.0, config.order_noise, size=config.top_k)
        ranked = picked[np.argsort(-score, kind="stable")]
        context = [instructions, *(documents[d] for d in ranked), Segment(keys(), questions[i])]
        turns = 1 + (int(rng.poisson(config.followups_mean)) if config.followups_mean > 0 else 0)
        previous: str | None = None
        for turn in range(turns):
            if turn:
                question = lognormal_lengths(rng, config.question_len_mean, config.length_sigma, 1, 4, 512)[0]
                context = [*context, Segment(keys(), question)]
            output_len = (
                outputs[i]
                if turn == 0
                else lognormal_lengths(rng, config.output_len_mean, config.length_sigma, 1, 4, 2048)[0]
            )
            answer = Segment(keys(), output_len)
            request_id = f"rag-{i}" if turn == 0 else f"rag-{i}-{turn}"
            requests.append(
                TraceRequest(
                    request_id=request_id,
                    session_id=f"rag-{i}",
                    prompt=context,
                    output_len=answer.length,
                    output_key=answer.key,
                    arrival_s=arrivals[i] if previous is None else None,
                    after=[] if previous is None else [previous],
                    think_time_s=0.0
                    if previous is None
                    else float(rng.exponential(config.think_time_mean_s)),
                )
            )
            context = [*context, answer]
            previous = request_id
    return Trace(header_for("rag", config, len(requests)), tuple(requests))
