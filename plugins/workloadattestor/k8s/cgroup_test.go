package k8s

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// cgroupWant is what podFromCgroups should make of a file: a pod and
// container, nothing (found false, no error), or an error containing errHas.
type cgroupWant struct {
	podUID, containerID string
	found               bool
	errHas              string
}

func cgInPod(podUID, containerID string) cgroupWant {
	return cgroupWant{podUID: podUID, containerID: containerID, found: true}
}

var (
	cgNotInPod = cgroupWant{}
	cgRefused  = func(errHas string) cgroupWant { return cgroupWant{errHas: errHas} }
)

// IDs for the cases written here (from SPIRE's tests).
const (
	cgPodUID        = "2c48913c-b29f-11e7-9350-020968147796"
	cgPodUIDSystemd = "2c48913c_b29f_11e7_9350_020968147796" // as the systemd driver writes it
	cgPodUID2       = "6bd2a4d3-a55a-4450-b6fd-2a7ecc72c904"
	cgContainerID   = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
	cgContainerID2  = "a55d9ac3b312d8a2627824b6d6dd8af66fbec439bf4e0ec22d6d9945ad337a38"
)

// cgroupFiles are the files of testdata/cgroup (SOURCES.md says where each
// came from) and what each should give.
var cgroupFiles = map[string]cgroupWant{
	// cgroupfs driver, every QoS class, containerd and Docker.
	"spire-cgroupfs-burstable-v1.txt":              cgInPod("2c48913c-b29f-11e7-9350-020968147796", "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"),
	"neuvector-cgroupfs-besteffort-v1.txt":         cgInPod("74ba62da-1a3d-11e7-bb11-080027cb0e22", "cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c"),
	"neuvector-cgroupfs-merged-controllers-v1.txt": cgInPod("1fe19bf5-e8ef-11e8-900c-52daee5a874d", "da31e536c8d61304a6d5998d163d12400a7a9a1003e1d86369e8fadb022fc17d"),
	"neuvector-kube-proxy-subcgroup-v1.txt":        cgInPod("f8a694f2-7c08-11e9-98da-000c29077430", "c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903"),
	"issue2578-kind-besteffort-v2.txt":             cgInPod("dfd874dc-ab52-4793-af47-d06b78b68337", "a3804295d867b752119eab99a9e6364fdf7fe6a4be5af0b11f9915fa7b64ff95"),
	"issue2578-kind-burstable-v2.txt":              cgInPod("bd445127-8720-434d-b38c-d308e9ff9b59", "a6fa3112ac317b1f2e8986a1fb4b783add5cf3ee6b6c9947dc513a6984da88fb"),
	"here-absolute-pod.txt":                        cgInPod("e84bf471-c04b-41ea-9f3a-a0d873d6af96", "ad2195fe9538badf6066c9983929282425f90d34472dadeb57e6756c9754cf6e"),
	// A real kubelet 1.30 and containerd 1.6 on this machine: every QoS
	// class, API and static pods.
	"kubelet-containerd-besteffort-api.txt":    cgInPod("0affb5da-7d31-4656-84c7-07b719d02adc", "b5fdc1b1fe47cc21f598ae82a994960d721b921aff7ec6a9c3b86037adb84f10"),
	"kubelet-containerd-burstable-api.txt":     cgInPod("8a0f290f-41f4-456e-9c23-2a82cdcf61fe", "680df2e519202ff93fa3996b70ec0ad9631c1805f968b69ba590ee78723719a6"),
	"kubelet-containerd-guaranteed-api.txt":    cgInPod("f663e315-2027-4341-91e2-bb3e73061562", "4d03a62431e53df3113dbe14d2877d5982828376884e0b17224645f779f3b10b"),
	"kubelet-containerd-besteffort-static.txt": cgInPod("82c6484b32db499aeb4cb34d20899b2f", "0863f30516c169a8e30a489e7de05c8ec168c66e7840b4cc73e1e025787e5020"),
	"kubelet-containerd-burstable-static.txt":  cgInPod("58b7e0bafcff416273cb0b700b02b94a", "02a8b427c18de498ab4b444ee4958e918f56d04fb4d7b6e6492007fd3bea7736"),
	"kubelet-containerd-host-process.txt":      cgNotInPod,
	// The agent in its own cgroup namespace sees other pods relative to it.
	"issue2578-relative-besteffort-v2.txt": cgInPod("055a09a0-eef1-43da-84a8-330ee9a68c52", "d504cebc2d0152abc58f72ab203ba05d224f76aafd2a6f4e3011b28f9179d089"),
	"issue2578-relative-burstable-v2.txt":  cgInPod("095e82d2-713c-467a-a18a-cbb50a075296", "6d1234da0f5aa7fa0ccae4c7d2d109929eb9a81694e6357bcd4547ab3985911b"),
	"issue2578-relative-guaranteed-v2.txt": cgInPod("c9eee628-98de-4c1c-8da3-b1c2bd380aab", "971356a9ee84ffc8b7913ca2aa694ab92ad7602cb1fa1ebf58ea8c9aa149d9f5"),
	"neuvector-docker-k8s-relative-v2.txt": cgInPod("fd698699-eabf-4c23-92ef-cf0bbdb78261", "2cc65c162ca1388b6b8d5ccfb701d22fc96675ccf8b2f1590c490c2c4039547f"),
	// ... and the containers of its own pod with no pod segment.
	"issue2578-same-pod-sibling-v2.txt": cgInPod("", "5b21e3cc4025c7aac5f56423e82b523850b16fb0df59ab2cb0880a66d3a2fb19"),
	"spire-crio-same-pod-v2.txt":        cgInPod("", "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"),
	"here-sibling.txt":                  cgInPod("", "ad2195fe9538badf6066c9983929282425f90d34472dadeb57e6756c9754cf6e"),
	// From inside a Docker container's namespace a sibling looks the same;
	// the kubelet then lists no such container.
	"neuvector-docker-sibling-no-pod-v2.txt": cgInPod("", "1f1d6e2d4940ddac13abd421a2617992bf89f0e0f9a902ed58278c5f843e9ae7"),
	// systemd driver: Docker, containerd, CRI-O, v1 and v2.
	"spire-systemd-docker-burstable-v1.txt":        cgInPod("2c48913c-b29f-11e7-9350-020968147796", "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"),
	"spire-systemd-crio-besteffort-v1.txt":         cgInPod("a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80", "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"),
	"neuvector-crio-systemd-v1.txt":                cgInPod("8ca306fa-3c03-47fa-97dd-19979c345572", "d6d725b909f37c3e232aadfbafa950a58bfe7baa579ba8c47a12be88bb921607"),
	"neuvector-crio-systemd-v2.txt":                cgInPod("042efd86-1f3b-4f2f-8736-f31c58e95bbc", "f33f47b0db740bb647cb3e7ac62d96c74966dbb99cbfaf4563bfd42d387e8b44"),
	"neuvector-containerd-systemd-v2.txt":          cgInPod("9493223b-520e-4a97-a45f-359dcf967006", "25d057a4c6c9555f2a0eb106e8896968c28f1c44aca4754174851aca7f89ad26"),
	"neuvector-bottlerocket-containerd-hybrid.txt": cgInPod("dd1bf9d1-241d-47f5-8e25-12de83135812", "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830"),
	"neuvector-containerd-colon-v1.txt":            cgInPod("2105e389-7471-476e-a50f-6074cef29bbd", "d3d8ccf5cca91931c6285c1d7472c413dd5a7700fddc0aa9f89a9ac7008b003e"),
	// A static pod: the UID is its manifest's hash, no dashes.
	"neuvector-crio-static-pod-v1.txt": cgInPod("487a0dc6dccaeefbcfedba7a7ce1ca18", "7a1fd6fe8cdfbd44dc78c4cc85dad7031eaab4365801684cad0aabdeaf863f9e"),
	// kind in Docker: the node container's ID comes first, and the v2 line
	// shows the node's containerd, not the pod.
	"spire-kind-docker-prefix-v1.txt": cgInPod("a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80", "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"),

	// Not in a pod.
	"spire-host-user-slice-v1.txt":                cgNotInPod,
	"neuvector-host-process-v1.txt":               cgNotInPod,
	"neuvector-nsenter-user-session-v1.txt":       cgNotInPod,
	"neuvector-host-init-scope-v2.txt":            cgNotInPod,
	"neuvector-host-from-ns-v2.txt":               cgNotInPod,
	"issue2578-containerd-service-from-ns-v2.txt": cgNotInPod,
	"issue2578-kubelet-service-v2.txt":            cgNotInPod,
	"here-host-process.txt":                       cgNotInPod,
	"here-host-from-ns.txt":                       cgNotInPod,
	"neuvector-docker-no-pod-v1.txt":              cgNotInPod,
	"neuvector-docker-no-pod-systemd-v1.txt":      cgNotInPod,
	"neuvector-docker-in-docker-no-pod-v1.txt":    cgNotInPod,
	"issue4088-crio-conmon-system-slice-v1.txt":   cgNotInPod,
	// The agent's own container is the root of its cgroup namespace.
	"neuvector-own-container-v2.txt": cgNotInPod,
	"here-own-container.txt":         cgNotInPod,

	// Refused.
	"spire-two-pods-constructed.txt":       cgRefused("two pods"),
	"spire-two-containers-constructed.txt": cgRefused("two containers"),
	"here-forged-user-delegation.txt":      cgRefused("delegated"),
}

func TestPodFromCgroupsFiles(t *testing.T) {
	dir := filepath.Join("testdata", "cgroup")
	sources, err := os.ReadFile(filepath.Join(dir, "SOURCES.md"))
	if err != nil {
		t.Fatal(err)
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.txt"))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, path := range names {
		name := filepath.Base(path)
		seen[name] = true
		t.Run(name, func(t *testing.T) {
			want, ok := cgroupFiles[name]
			if !ok {
				t.Fatalf("%s has no expected result in cgroupFiles", name)
			}
			if !bytes.Contains(sources, []byte("`"+name+"`")) {
				t.Errorf("SOURCES.md does not say where %s came from", name)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			checkPodFromCgroups(t, data, want)
		})
	}
	for name := range cgroupFiles {
		if !seen[name] {
			t.Errorf("cgroupFiles lists %s, which is not in %s", name, dir)
		}
	}
}

// Single paths, each the v2 line of a file, for the shapes that no whole
// file in testdata shows. Where a path comes from is in its comment.
func TestPodFromCgroupsPaths(t *testing.T) {
	for _, tc := range []struct {
		name, path string
		want       cgroupWant
	}{
		// SPIRE #1535: Guaranteed pods sit directly under kubepods.
		{"guaranteed cgroupfs", "/kubepods/pod0f188573-8e4f-11ea-a9a0-42010a800047/a5f33a8bc7e275a722763a9d46f432c59b35bb3edbd8dab7cf77148e90916cde",
			cgInPod("0f188573-8e4f-11ea-a9a0-42010a800047", "a5f33a8bc7e275a722763a9d46f432c59b35bb3edbd8dab7cf77148e90916cde")},
		{"guaranteed systemd", "/kubepods.slice/kubepods-pod" + cgPodUIDSystemd + ".slice/cri-containerd-" + cgContainerID + ".scope", cgInPod(cgPodUID, cgContainerID)},
		// SPIRE #949.
		{"systemd docker besteffort", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podc68f332c_8897_11e9_9797_525400c9c704.slice/docker-ab704ba978feea085662fd58c3448624de9287dd50c7d01608b27b08f96c8725.scope",
			cgInPod("c68f332c-8897-11e9-9797-525400c9c704", "ab704ba978feea085662fd58c3448624de9287dd50c7d01608b27b08f96c8725")},
		// SPIRE #1580: runc's "slice:prefix:name" as one cgroup name.
		{"containerd colon form", "/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2",
			cgInPod("72f7f152-440c-66ac-9084-e0fc1d8a910c", "b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2")},
		// SPIRE's tests: Docker Desktop's doubled kubepods, minikube's CRI-O.
		{"docker desktop", "/kubepods/kubepods/besteffort/pod" + cgPodUID2 + "/" + cgContainerID2, cgInPod(cgPodUID2, cgContainerID2)},
		{"minikube crio", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod561fd272_d131_47ef_a01b_46a997a778f3.slice/crio-030ded69d4c98fcf69c988f75a5eb3a1b4357e1432bd5510c936a40d7e9a1198.scope",
			cgInPod("561fd272-d131-47ef-a01b-46a997a778f3", "030ded69d4c98fcf69c988f75a5eb3a1b4357e1432bd5510c936a40d7e9a1198")},
		// kubernetes/minikube#11280: CRI-O's systemd slices inside a Docker node.
		{"minikube crio in docker", "/docker/d5d9ee5cf5ec9520d182418b737fb11f3aa6b739e91d7cb6ecd6786f6a2bcbd1/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2cde702b_a0cf_438d_a228_fb164e54434b.slice/crio-0765f197c9158576f202e50498b488cd0d2b022fb2462b0a629f214bb51cd57d.scope",
			cgInPod("2cde702b-a0cf-438d-a228-fb164e54434b", "0765f197c9158576f202e50498b488cd0d2b022fb2462b0a629f214bb51cd57d")},
		// kind with the systemd driver and cgroup root "kubelet": inside the
		// node, through a Docker host's cgroupfs and a systemd host's.
		{"kind systemd", "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podf6ec7293_3d26_407f_8861_8593e009f36e.slice/cri-containerd-d5a41c7c2ea9956c57b5c72dc267b1dae12f3dfc5e36021dffd3dd8082f59571.scope",
			cgInPod("f6ec7293-3d26-407f-8861-8593e009f36e", "d5a41c7c2ea9956c57b5c72dc267b1dae12f3dfc5e36021dffd3dd8082f59571")},
		{"kind systemd in docker", "/docker/65a1b6ad09655b3f1475ede1aa0061a97c0d1ada9f2b2acac959afbc92094463/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod96dd7de3_0783_4613_a707_e0effc077ef5.slice/cri-containerd-13a0f64b909e3ff2d63f196d6947927a8af997ab68f8fa9ebb6d6c7018af4ec9.scope",
			cgInPod("96dd7de3-0783-4613-a707-e0effc077ef5", "13a0f64b909e3ff2d63f196d6947927a8af997ab68f8fa9ebb6d6c7018af4ec9")},
		{"kind systemd in systemd docker", "/system.slice/docker-3350ade4226f0adcd9e4e9545d7c2a16a5aa362d12315f2a88e2024cea1246cf.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podb6a16766_05ee_446a_8ee5_ff96a817f47c.slice/cri-containerd-679f3691f7f1b20198548be43b86f265f9fff9be0ac4c973638f5ee89decbca9.scope",
			cgInPod("b6a16766-05ee-446a-8ee5-ff96a817f47c", "679f3691f7f1b20198548be43b86f265f9fff9be0ac4c973638f5ee89decbca9")},
		// Static pods: the kubelet's 32-hex config hash, both drivers.
		{"static pod cgroupfs", "/kubepods/besteffort/pod2732ca68f6358eba7703fb6f82a25c94/" + cgContainerID, cgInPod("2732ca68f6358eba7703fb6f82a25c94", cgContainerID)},
		{"static pod systemd", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2732ca68f6358eba7703fb6f82a25c94.slice/cri-containerd-" + cgContainerID + ".scope", cgInPod("2732ca68f6358eba7703fb6f82a25c94", cgContainerID)},
		// SPIRE's tests: no kubepods ancestor is needed (cgroup namespaces
		// hide it), underscores are canonicalized in either form.
		{"no kubepods", "/something/pod" + cgPodUID + "/" + cgContainerID, cgInPod(cgPodUID, cgContainerID)},
		{"underscores cgroupfs", "/kubepods/pod" + cgPodUIDSystemd + "/" + cgContainerID, cgInPod(cgPodUID, cgContainerID)},
		// A cgroup root whose name starts with "pod" (--cgroup-root=pods).
		{"parent named pod", "/pods.slice/pods-besteffort.slice/pods-besteffort-pod" + cgPodUIDSystemd + ".slice/cri-containerd-" + cgContainerID + ".scope", cgInPod(cgPodUID, cgContainerID)},
		// CRI-O's cgroupfs driver and crun's payload subgroup.
		{"crio cgroupfs", "/kubepods/besteffort/pod" + cgPodUID + "/crio-" + cgContainerID, cgInPod(cgPodUID, cgContainerID)},
		{"crun subgroup", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + cgPodUIDSystemd + ".slice/crio-" + cgContainerID + ".scope/container", cgInPod(cgPodUID, cgContainerID)},
		{"crun subgroup sibling", "/../../crio-" + cgContainerID + ".scope/container", cgInPod("", cgContainerID)},
		// CRI-O's conmon (conmon_cgroup = "pod") is in the pod, not a container.
		{"crio conmon in pod", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podccfb2838_0553_4f4d_8d7a_6eeb61421a3c.slice/crio-conmon-ad65d88fc253f565f3cdfcc61f7207eed2b6db383f32669ff93c3100dd835186.scope", cgNotInPod},
		{"podman conmon", "/machine.slice/libpod-conmon-" + cgContainerID + ".scope", cgNotInPod},
		// A pod-level cgroup with no container below it.
		{"pod level only", "/kubepods/besteffort/pod" + cgPodUID, cgNotInPod},
		{"pod then not a container", "/kubepods/besteffort/pod" + cgPodUID + "/init", cgNotInPod},
		// A container ID with no pod (SPIRE's legacy tests).
		{"just container", "/" + cgContainerID, cgNotInPod},
		{"kubepods no pod", "/kubepods/" + cgContainerID, cgNotInPod},
		{"docker systemd", "/system.slice/docker-" + cgContainerID + ".scope", cgNotInPod},
		{"too far above our namespace", "/../../../" + cgContainerID, cgNotInPod},
		// The outermost pod decides: a nested cluster inside a container
		// (kind in a pod) cannot claim another pod.
		{"nested pod", "/kubepods/burstable/pod" + cgPodUID + "/" + cgContainerID + "/kubelet/kubepods/besteffort/pod" + cgPodUID2 + "/" + cgContainerID2, cgInPod(cgPodUID, cgContainerID)},
		{"nested in sibling", "/../" + cgContainerID + "/kubelet/kubepods/besteffort/pod" + cgPodUID2 + "/" + cgContainerID2, cgInPod("", cgContainerID)},
		// A user's systemd manager may create cgroups of any name.
		{"user delegation systemd names", "/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-besteffort-pod" + cgPodUIDSystemd + ".slice/cri-containerd-" + cgContainerID + ".scope", cgRefused("delegated")},
		{"user delegation relative", "/../../../../user.slice/user-1000.slice/user@1000.service/pod" + cgPodUID + "/" + cgContainerID, cgRefused("delegated")},
		{"user manager only", "/user@1000.service/pod" + cgPodUID + "/" + cgContainerID, cgRefused("delegated")},
		{"user slice is fine without a pod", "/user.slice/user-1000.slice/user@1000.service/app.slice/" + cgContainerID, cgNotInPod},
		// UIDs and IDs as the kubelet and runtimes write them, no other.
		{"uppercase uid", "/kubepods/pod2C48913C-B29F-11E7-9350-020968147796/" + cgContainerID, cgNotInPod},
		{"uppercase id", "/kubepods/pod" + cgPodUID + "/" + strings.ToUpper(cgContainerID), cgNotInPod},
		{"mixed separators", "/kubepods/pod2c48913c-b29f_11e7-9350-020968147796/" + cgContainerID, cgNotInPod},
		{"short id", "/kubepods/pod" + cgPodUID + "/" + cgContainerID[1:], cgNotInPod},
		{"long id", "/kubepods/pod" + cgPodUID + "/0" + cgContainerID, cgNotInPod},
		{"slice without parent", "/pod" + cgPodUIDSystemd + ".slice/docker-" + cgContainerID + ".scope", cgNotInPod},
		{"slice with junk after", "/kubepods-pod" + cgPodUIDSystemd + ".slicex/docker-" + cgContainerID + ".scope", cgNotInPod},
		{"runtime without name", "/kubepods/pod" + cgPodUID + "/-" + cgContainerID, cgNotInPod},
		{"colon without runtime", "/kubepods-pod" + cgPodUIDSystemd + ".slice::" + cgContainerID, cgNotInPod},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkPodFromCgroups(t, []byte("0::"+tc.path+"\n"), tc.want)
		})
	}
}

// Files the kernel does not write, and files whose lines disagree.
func TestPodFromCgroupsLines(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		want       cgroupWant
	}{
		{"empty", "", cgNotInPod},
		{"blank lines", "\n\n", cgNotInPod},
		{"no trailing newline", "0::/kubepods/pod" + cgPodUID + "/" + cgContainerID, cgInPod(cgPodUID, cgContainerID)},
		{"pod-only line agrees", "1:pids:/kubepods/pod" + cgPodUID + "\n0::/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\n", cgInPod(cgPodUID, cgContainerID)},
		{"sibling line agrees", "1:pids:/../" + cgContainerID + "\n0::/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\n", cgInPod(cgPodUID, cgContainerID)},
		{"pod-only line disagrees", "1:pids:/kubepods/pod" + cgPodUID2 + "\n0::/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\n", cgRefused("two pods")},
		{"sibling line disagrees", "1:pids:/../" + cgContainerID2 + "\n0::/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\n", cgRefused("two containers")},
		{"docker host line ignored", "1:pids:/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\n0::/docker/" + cgContainerID2 + "/system.slice/containerd.service\n", cgInPod(cgPodUID, cgContainerID)},
		{"no hierarchy id", ":pids:/\n", cgRefused("hierarchy ID")},
		{"letters for hierarchy id", "x::/\n", cgRefused("hierarchy ID")},
		{"one colon", "0:/\n", cgRefused("two colons")},
		{"relative path", "0::kubepods\n", cgRefused("start with /")},
		{"empty path", "0::\n", cgRefused("start with /")},
		{"bad line after good", "0::/kubepods/pod" + cgPodUID + "/" + cgContainerID + "\ngarbage\n", cgRefused("line 2")},
		{"too large", strings.Repeat("0::/\n", maxCgroupFileSize/4), cgRefused("over")},
		{"at the limit", strings.Repeat("0::/"+strings.Repeat("x", 59)+"\n", maxCgroupFileSize/64), cgNotInPod},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkPodFromCgroups(t, []byte(tc.file), tc.want)
		})
	}
}

func checkPodFromCgroups(t *testing.T, data []byte, want cgroupWant) {
	t.Helper()
	podUID, containerID, found, err := podFromCgroups(data)
	if want.errHas != "" {
		if err == nil || !strings.Contains(err.Error(), want.errHas) {
			t.Fatalf("podFromCgroups = %q, %q, %v, %v; want an error containing %q", podUID, containerID, found, err, want.errHas)
		}
		if podUID != "" || containerID != "" || found {
			t.Errorf("podFromCgroups returned %q, %q, %v with its error", podUID, containerID, found)
		}
		return
	}
	if err != nil {
		t.Fatalf("podFromCgroups: %v", err)
	}
	if got := (cgroupWant{podUID: podUID, containerID: containerID, found: found}); got != want {
		t.Errorf("podFromCgroups = %+v; want %+v", got, want)
	}
}

func BenchmarkPodFromCgroups(b *testing.B) {
	for _, name := range []string{
		"kubelet-containerd-besteffort-api.txt", // 10 lines, cgroupfs, captured here
		"spire-systemd-crio-besteffort-v1.txt",  // 13 lines, systemd
		"neuvector-containerd-systemd-v2.txt",   // one line
		"kubelet-containerd-host-process.txt",   // not in a pod
	} {
		data, err := os.ReadFile(filepath.Join("testdata", "cgroup", name))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(strings.TrimSuffix(name, ".txt"), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, _, _, err := podFromCgroups(data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
