"""An IMDSv2 emulator for one instance of LocalStack's EC2 (LocalStack has no
instance metadata service). Answers the paths ipamd reads, from LocalStack's
current state, on 127.0.0.1 only. Tokens are required, as IMDSv2 requires.

usage: imds.py INSTANCE_ID PORT"""

import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

ENDPOINT = "http://127.0.0.1:4566"
TOKENS: set = set()


def ec2():
    return boto3.client("ec2", endpoint_url=ENDPOINT, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def metadata(instance_id: str, path: str):
    c = ec2()
    inst = c.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    enis = c.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["NetworkInterfaces"]
    primary = next(e for e in enis if e["Attachment"]["DeviceIndex"] == 0)
    vpc = c.describe_vpcs(VpcIds=[inst["VpcId"]])["Vpcs"][0]
    by_mac = {e["MacAddress"]: e for e in enis}
    simple = {
        "instance-id": instance_id,
        "instance-type": inst["InstanceType"],
        "placement/availability-zone": inst["Placement"]["AvailabilityZone"],
        "mac": primary["MacAddress"],
        "local-ipv4": primary["PrivateIpAddress"],
        "network/interfaces/macs/": "\n".join(m + "/" for m in by_mac),
    }
    if path in simple:
        return simple[path]
    prefix = "network/interfaces/macs/"
    if path.startswith(prefix):
        mac, _, leaf = path[len(prefix):].partition("/")
        e = by_mac.get(mac)
        if e is None:
            return None
        subnet = c.describe_subnets(SubnetIds=[e["SubnetId"]])["Subnets"][0]
        return {
            "interface-id": e["NetworkInterfaceId"],
            "device-number": str(e["Attachment"]["DeviceIndex"]),
            "subnet-id": e["SubnetId"],
            "subnet-ipv4-cidr-block": subnet["CidrBlock"],
            "vpc-id": e["VpcId"],
            "vpc-ipv4-cidr-blocks": "\n".join(a["CidrBlock"] for a in vpc.get("CidrBlockAssociationSet", [])) or vpc["CidrBlock"],
            "security-group-ids": "\n".join(g["GroupId"] for g in e.get("Groups", [])),
            "local-ipv4s": "\n".join(a["PrivateIpAddress"] for a in e["PrivateIpAddresses"]),
        }.get(leaf)
    return None


class Handler(BaseHTTPRequestHandler):
    instance_id = ""

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, code: int, body: str, headers=None):
        data = body.encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self._send(400, "")
        token = secrets.token_hex(16)
        TOKENS.add(token)
        ttl = self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self._send(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") not in TOKENS:
            return self._send(401, "")
        if not self.path.startswith("/latest/meta-data/"):
            return self._send(404, "")
        try:
            value = metadata(self.instance_id, self.path[len("/latest/meta-data/"):])
        except Exception as e:  # LocalStack unreachable or the instance gone
            return self._send(500, str(e))
        if value is None:
            return self._send(404, "")
        self._send(200, value)


def main() -> None:
    Handler.instance_id = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    print(f"imds listening on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
