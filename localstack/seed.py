"""Seeds LocalStack's EC2 with what a node needs: a VPC, subnets (one tagged
for the CNI, one excluded with the tag set to 0), a security group and an
instance. Prints the ids as JSON. Every run makes a fresh VPC."""

import json
import sys

import boto3

ENDPOINT = "http://127.0.0.1:4566"


def main() -> None:
    instance_type = sys.argv[1] if len(sys.argv) > 1 else "m5.large"
    second_octet = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    ec2 = boto3.client("ec2", endpoint_url=ENDPOINT, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    net = f"10.{second_octet}"
    vpc = ec2.create_vpc(CidrBlock=f"{net}.0.0/16")["Vpc"]["VpcId"]
    zone = "us-east-1a"
    node = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{net}.0.0/20", AvailabilityZone=zone)["Subnet"]["SubnetId"]
    pods = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{net}.16.0/20", AvailabilityZone=zone)["Subnet"]["SubnetId"]
    excluded = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{net}.32.0/19", AvailabilityZone=zone)["Subnet"]["SubnetId"]
    ec2.create_tags(Resources=[pods], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "1"}])
    ec2.create_tags(Resources=[excluded], Tags=[{"Key": "kubernetes.io/role/cni", "Value": "0"}])
    sg = ec2.create_security_group(GroupName=f"nodes-{vpc}", Description="nodes", VpcId=vpc)["GroupId"]
    inst = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType=instance_type,
                             SubnetId=node, SecurityGroupIds=[sg],
                             Placement={"AvailabilityZone": zone})["Instances"][0]
    print(json.dumps({
        "vpc": vpc, "node_subnet": node, "pods_subnet": pods, "excluded_subnet": excluded,
        "security_group": sg, "instance": inst["InstanceId"], "zone": zone,
    }))


if __name__ == "__main__":
    main()
