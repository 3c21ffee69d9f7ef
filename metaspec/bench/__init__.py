"""Benchmarks, one module each: `arms` (`metaspec bench`: every arm vs AR per prompt category), `serve`
(`metaspec bench serve`: throughput and latency under concurrent load, vLLM-style), with their helpers
(`load`: concurrent or Poisson clients; `backends`: in-process engine, gRPC, OpenAI HTTP; `report`: metrics,
table, plot; `hf_batch`: HF `generate_batch`; `baseline`: the same load on another commit's engine)."""
