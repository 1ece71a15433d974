"""Looks at and changes LocalStack's EC2 for the tests, independently of the
code under test.

  ec2.py enis INSTANCE                 interfaces attached to INSTANCE (JSON)
  ec2.py orphan SUBNET AGE_SECONDS     an unattached interface tagged as ours,
                                       created AGE_SECONDS ago; prints its id
  ec2.py exists ENI                    prints true or false
"""

import json
import sys
import time

import boto3

c = boto3.client("ec2", endpoint_url="http://127.0.0.1:4566", region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test")
cmd = sys.argv[1]
if cmd == "enis":
    enis = c.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [sys.argv[2]]}])["NetworkInterfaces"]
    print(json.dumps([{
        "id": e["NetworkInterfaceId"],
        "device_index": e["Attachment"]["DeviceIndex"],
        "secondary": [a["PrivateIpAddress"] for a in e["PrivateIpAddresses"] if not a.get("Primary")],
        "tags": {t["Key"]: t["Value"] for t in e.get("TagSet", [])},
        "subnet": e["SubnetId"],
    } for e in enis]))
elif cmd == "orphan":
    created = int(time.time()) - int(sys.argv[3])
    e = c.create_network_interface(SubnetId=sys.argv[2], TagSpecifications=[{
        "ResourceType": "network-interface",
        "Tags": [{"Key": "vpc-cni.io/owner", "Value": "vpc-cni"},
                 {"Key": "vpc-cni.io/created-at", "Value": str(created)}]}])
    print(e["NetworkInterface"]["NetworkInterfaceId"])
elif cmd == "exists":
    try:
        c.describe_network_interfaces(NetworkInterfaceIds=[sys.argv[2]])
        print("true")
    except c.exceptions.ClientError:
        print("false")
