"""Explicit memories: the reference encoder (encoder), the bank format and its files
(bank_format, bank_shards), its readers (bank_reader, cold_start), the offline encode
job (encode_job, pq_training, bank_storage), and memory codecs (codecs, pq,
quantization_quality)."""
