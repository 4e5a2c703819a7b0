wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"codestral-latest","prompt":"def f(x):","max_tokens":1,"temperature":0}'
