package k8s

import (
	"strconv"

	"github.com/distribution/reference"
	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// podSelectors are SPIRE's pod-level selectors (getSelectorValuesFromPodInfo
// in SPIRE 1.13): sa, ns, node-name, pod-uid, pod-name, the image counts,
// every image of every container and init container, labels and owners.
func podSelectors(p *pod) []selector.Selector {
	m, sp, st := &p.Metadata, &p.Spec, &p.Status
	sels := make([]selector.Selector, 0, 7+3*len(st.ContainerStatuses)+3*len(st.InitContainerStatuses)+len(m.Labels)+2*len(m.OwnerReferences)+3)
	sels = append(sels,
		sel("sa:"+sp.ServiceAccountName),
		sel("ns:"+m.Namespace),
		sel("node-name:"+sp.NodeName),
		sel("pod-uid:"+m.UID),
		sel("pod-name:"+m.Name),
		sel("pod-image-count:"+strconv.Itoa(len(st.ContainerStatuses))),
		sel("pod-init-image-count:"+strconv.Itoa(len(st.InitContainerStatuses))),
	)
	for _, cs := range st.ContainerStatuses {
		sels = appendImages(sels, "pod-image:", cs, specImage(sp.Containers, cs.Name))
	}
	for _, cs := range st.InitContainerStatuses {
		sels = appendImages(sels, "pod-init-image:", cs, specImage(sp.InitContainers, cs.Name))
	}
	for k, v := range m.Labels {
		sels = append(sels, sel("pod-label:"+k+":"+v))
	}
	for _, o := range m.OwnerReferences {
		sels = append(sels, sel("pod-owner:"+o.Kind+":"+o.Name), sel("pod-owner-uid:"+o.Kind+":"+o.UID))
	}
	return sels
}

// containerSelectors are those of the workload's own container.
func containerSelectors(sels []selector.Selector, cs containerStatus, spec []specContainer) []selector.Selector {
	sels = append(sels, sel("container-name:"+cs.Name))
	return appendImages(sels, "container-image:", cs, specImage(spec, cs.Name))
}

// appendImages adds a container's image as SPIRE does, its digest
// (status.imageID) and its name, except that the name is the one the pod
// asked for (spec.image, as written and normalized) rather than
// status.image. The status shows whichever tag the runtime found first
// for the image's digest (the CRI does not say which), so when two tags
// share a digest a pod started as tag-b can show tag-a and would get the
// selectors of tag-a's pods (SPIRE #4276). status.image is still given
// when it names the same reference as the spec.
func appendImages(sels []selector.Selector, prefix string, cs containerStatus, spec string) []selector.Selector {
	var seen [4]string
	n := 0
	add := func(v string) {
		if v == "" {
			return
		}
		for _, s := range seen[:n] {
			if s == v {
				return
			}
		}
		seen[n] = v
		n++
		sels = append(sels, sel(prefix+v))
	}
	add(cs.ImageID)
	if spec == "" {
		return sels
	}
	add(spec)
	norm, ok := normalizeImage(spec)
	if ok {
		add(norm)
	}
	if cs.Image == spec || ok && sameImage(cs.Image, norm) {
		add(cs.Image)
	}
	return sels
}

// specImage is the image the pod's spec gives the named container.
func specImage(spec []specContainer, name string) string {
	for _, c := range spec {
		if c.Name == name {
			return c.Image
		}
	}
	return ""
}

// normalizeImage writes an image reference in full, as container runtimes
// report it: nginx:1.25 is docker.io/library/nginx:1.25, and a reference
// without tag or digest gets :latest.
func normalizeImage(image string) (string, bool) {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return "", false
	}
	return reference.TagNameOnly(named).String(), true
}

func sameImage(image, normalized string) bool {
	n, ok := normalizeImage(image)
	return ok && n == normalized
}

func sel(value string) selector.Selector {
	return selector.Selector{Type: PluginName, Value: value}
}
