#!/usr/bin/env python3
"""Serves the git repositories under ROOT over HTTPS with basic authentication, through git's
own smart-HTTP CGI (`git http-backend`), for the real node's private-repository tests.

usage: git-https.py ROOT ADDRESS PORT CERT KEY USER PASSWORD

Every request without the right credentials gets 401, so a clone proves they were sent."""
import base64
import http.server
import ssl
import subprocess
import sys

root, address, port, cert, key, user, password = sys.argv[1:8]
expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Git(http.server.BaseHTTPRequestHandler):
    def handle_git(self):
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
            "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": user,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = handle_git
    do_POST = handle_git

    def log_message(self, fmt, *args):
        sys.stderr.write("git-https: " + fmt % args + "\n")


server = http.server.ThreadingHTTPServer((address, int(port)), Git)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("serving", flush=True)
server.serve_forever()
