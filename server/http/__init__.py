"""The HTTP/JSON front end (--http-port): the Generator API over HTTP/1.1 with server-sent
events for streams, and the browser playground at /. front.py starts it; docs/http.md
describes it."""
