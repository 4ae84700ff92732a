# Fills a SQLite registry by SQL straight into its tables (the CLI would
# generate a key pair per server): N servers, 1 % Proxmox hosts (with an
# nginx proxy each), the rest guests with one port forward and one hostname
# forward each. Model `web` must exist. Usage: fill-registry.py DB N.
# Used by scripts/bench-idle and scripts/bench-http.
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1]); n = int(sys.argv[2]); c = db.cursor()
now = int(time.time() * 1000)
mid = c.execute("select id from models where name='web'").fetchone()[0]
nhosts = max(1, n // 100)
hosts = []
for h in range(nhosts):
    c.execute("insert into servers (name, model_id, minion_id, status, is_proxmox_host, external_interface, external_ip, internal_network, created_at, updated_at) values (?,?,?,?,?,?,?,?,?,?)",
              (f"pve{h}.example.org", mid, f"pve{h}-00000000", "online", 1, "vmbr0", f"198.51.{100 + h // 250}.{h % 250 + 1}", f"10.{h % 250}.0.0/16", now, now))
    hosts.append(c.lastrowid)
for h, hid in enumerate(hosts):
    c.execute("update servers set nginx_proxy = ? where id = ?", (hosts[(h + 1) % nhosts], hid))
for g in range(n - nhosts):
    h = g % nhosts; hid = hosts[h]
    c.execute("insert into servers (name, model_id, minion_id, status, is_vm, vm_host, internal_ip, created_at, updated_at) values (?,?,?,?,?,?,?,?,?)",
              (f"vm{g}.example.org", mid, f"vm{g}-00000000", "online", 1, hid, f"10.{h % 250}.{(g // nhosts) // 250}.{(g // nhosts) % 250 + 1}", now, now))
    gid = c.lastrowid
    c.execute("insert into port_forwards (host_id, dest_id, proto, source_port, dest_port, created_at, updated_at) values (?,?,?,?,?,?,?)",
              (hid, gid, "tcp", 10000 + g // nhosts, 80, now, now))
    c.execute("insert into hostname_forwards (domain, dest_id, host_id, proxy_id, listen_port, dest_port, path, created_at, updated_at) values (?,?,?,?,?,?,?,?,?)",
              (f"site{g}.example.org", gid, hid, hosts[(h + 1) % nhosts], 80, 8080, "/", now, now))
db.commit()
q = lambda t: c.execute(f"select count(*) from {t}").fetchone()[0]
print(f"servers {q('servers')}, port forwards {q('port_forwards')}, hostname forwards {q('hostname_forwards')}", file=sys.stderr)
