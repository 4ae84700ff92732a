"""Small servers and clients for the network and nginx labs (support/netns.rs,
support/nginx.rs). Standard library only. Every server prints READY on stdout
once it is bound, then serves until killed.

    lab_servers.py http-dir ADDR PORT DIR      serves the files of DIR
    lab_servers.py http-peer ADDR PORT         answers the client's address
    lab_servers.py http-echo ADDR PORT NAME    answers JSON: NAME, path, proxy headers
    lab_servers.py udp-echo ADDR PORT          sends each datagram back
    lab_servers.py udp-client IP PORT PAYLOAD [SRC_PORT]
        one datagram from a connected socket, prints the answer; exits 2 on
        "connection refused" (an ICMP port unreachable), 3 on no answer in 2 s
"""

import functools
import http.server
import json
import socket
import socketserver
import sys


def ready():
    sys.stdout.write("READY\n")
    sys.stdout.flush()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def http_dir(addr, port, directory):
    handler = functools.partial(Quiet, directory=directory)
    srv = Server((addr, int(port)), handler)
    ready()
    srv.serve_forever()


class Peer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def http_peer(addr, port):
    srv = Server((addr, int(port)), Peer)
    ready()
    srv.serve_forever()


def http_echo(addr, port, name):
    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            h = self.headers
            body = json.dumps(
                {
                    "backend": name,
                    "path": self.path,
                    "host": h.get("Host"),
                    "x_real_ip": h.get("X-Real-IP"),
                    "x_forwarded_for": h.get("X-Forwarded-For"),
                    "x_forwarded_proto": h.get("X-Forwarded-Proto"),
                    "x_forwarded_host": h.get("X-Forwarded-Host"),
                },
                sort_keys=True,
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = Server((addr, int(port)), Echo)
    ready()
    srv.serve_forever()


def udp_echo(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, int(port)))
    ready()
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def udp_client(ip, port, payload, src_port=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if src_port:
        s.bind(("0.0.0.0", int(src_port)))
    s.settimeout(2)
    s.connect((ip, int(port)))
    try:
        s.send(payload.encode())
        data = s.recv(65535)
    except ConnectionRefusedError:
        sys.stderr.write("connection refused\n")
        sys.exit(2)
    except socket.timeout:
        sys.stderr.write("no answer within 2 s\n")
        sys.exit(3)
    sys.stdout.write(data.decode(errors="replace"))


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    {
        "http-dir": http_dir,
        "http-peer": http_peer,
        "http-echo": http_echo,
        "udp-echo": udp_echo,
        "udp-client": udp_client,
    }[mode](*args)


if __name__ == "__main__":
    main()
