"""What runs in a worker's pool children, one request at a time: the Celery task
(`infer`, step 3), its claim and record (`ledger`), the call to llama-server (`upstream`,
step 4), the frames it publishes (`publisher`, step 5) or a batch item's result
(`batch_sink`), and what the children inherit (`runtime`, `tasklog`)."""
